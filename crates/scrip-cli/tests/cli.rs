//! End-to-end tests of the `scrip` binary: the real executable, run as a
//! child process, with its exit codes, its output and, for `serve`, its files,
//! signals and HTTP answers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const EXAMPLES: &str = "examples.test.toml";

/// The repository's policy directory.
fn repo_policies() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies"))
}

/// A `scrip` command with a clean environment for scrip's own variables.
fn scrip() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scrip"));
    cmd.env_remove("SCRIP_CONFIG")
        .env_remove("SCRIP_LOG_FORMAT")
        .env("SCRIP_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

fn run(args: &[&str]) -> Output {
    scrip().args(args).output().expect("run scrip")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Copies the `*.cedar` and `*.cedarschema` files of the repository's policy
/// directory into `to` (created).
fn copy_policies(to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(repo_policies()).unwrap() {
        let path = entry.unwrap().path();
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("cedar" | "cedarschema")) {
            fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// A plain HTTP/1.1 GET: the status and the body, or `None` when the server
/// does not answer (yet).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Waits at most `limit` for the child to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A `scrip serve` child: killed when dropped, so a failing test leaves no
/// server behind. Its stderr goes to a file the test can read.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// Starts `scrip serve --config <config>` in `dir`, listening on `addr`.
    fn start(dir: &Path, config: &str, addr: SocketAddr, log_name: &str) -> Self {
        let log = dir.join(log_name);
        let stderr = fs::File::create(&log).unwrap();
        let child = scrip()
            .args(["serve", "--config", config])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("start scrip serve");
        Self { child, addr, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the metadata endpoint answers 200; panics with the log if
    /// the server exits or does not answer in time.
    fn wait_ready(&mut self) -> serde_json::Value {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("scrip serve exited with {status}:\n{}", self.log());
            }
            if let Some((200, body)) =
                http_get(self.addr, "/.well-known/oauth-authorization-server")
            {
                return serde_json::from_str(&body).expect("metadata is JSON");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("scrip serve did not answer in time:\n{}", self.log());
    }

    /// Waits until the log holds `needle`.
    fn wait_log(&mut self, needle: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if self.log().contains(needle) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "scrip serve exited with {status} before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("scrip serve did not log {needle:?}:\n{}", self.log());
    }

    /// The `kid` of the single key of the JWKS.
    fn jwks_kid(&self) -> String {
        let (status, body) = http_get(self.addr, "/jwks").expect("jwks answers");
        assert_eq!(status, 200);
        let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1, "{jwks}");
        keys[0]["kid"].as_str().unwrap().to_owned()
    }

    /// Sends SIGTERM and returns how the server exited.
    fn terminate(&mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        wait_exit(&mut self.child, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("scrip serve ignored SIGTERM:\n{}", self.log()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `<dir>/scrip.toml` listening on a free port, plus `extra` lines.
fn write_config(dir: &Path, extra: &str) -> SocketAddr {
    let addr = SocketAddr::from(([127, 0, 0, 1], scrip_testkit::free_port()));
    fs::write(
        dir.join("scrip.toml"),
        format!("listen = \"{addr}\"\n{extra}"),
    )
    .unwrap();
    addr
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

// --- help and usage --------------------------------------------------------

/// Approval ids are base64url and start with `-` one time in 64: `approve`
/// and `deny` take such an id as the id, not as an unknown flag, and still
/// answer `--help`.
#[test]
fn an_approval_id_may_start_with_a_hyphen() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let socket = socket.to_str().unwrap();
    for args in [
        &["approve", "-dXYZ", "--socket", socket][..],
        &["deny", "-dXYZ", "--reason", "no", "--socket", socket][..],
    ] {
        let out = run(args);
        let stderr = text(&out.stderr);
        // Past the argument parser: it fails on the missing socket instead.
        assert_ne!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("socket"), "{args:?}: {stderr}");
    }
    for command in ["approve", "deny"] {
        let out = run(&[command, "--help"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("<ID>"), "{}", text(&out.stdout));
    }
}

#[test]
fn help_describes_every_command() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &["credential broker", "serve", "policy", "--log-format"],
        ),
        (
            &["serve", "--help"],
            &["Run the token service", "--config", "SIGHUP", "0600"],
        ),
        (
            &["policy", "--help"],
            &["Check and test Cedar policies", "check", "test"],
        ),
        (
            &["policy", "check", "--help"],
            &["Validate the policies", "<DIR>", "--config"],
        ),
        (
            &["policy", "test", "--help"],
            &[
                "expected decision",
                "docs/policy-tests.md",
                "<FILE>",
                "--policies",
                "--config",
            ],
        ),
    ];
    for (args, needles) in cases {
        let out = run(args);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "scrip {args:?}: {out:?}");
        for needle in *needles {
            assert!(
                stdout.contains(needle),
                "`scrip {}` does not mention {needle:?}:\n{stdout}",
                args.join(" ")
            );
        }
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["frobnicate"][..],
        &["policy", "frobnicate"],
        &["policy", "check"],
        &["serve", "--no-such-flag"],
        &[],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "scrip {args:?}: {out:?}");
        assert!(
            text(&out.stderr).contains("Usage"),
            "scrip {args:?}: {}",
            text(&out.stderr)
        );
    }
}

// --- policy check ----------------------------------------------------------

#[test]
fn policy_check_accepts_the_shipped_policies() {
    let out = run(&["policy", "check", repo_policies().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("ok: "), "{stdout}");
    assert!(stdout.contains("validate"), "{stdout}");
}

#[test]
fn policy_check_refuses_a_policy_that_does_not_parse() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(dir.path());
    fs::write(
        dir.path().join("broken.cedar"),
        "permit (principal, action, resource\nwhen { true };\n",
    )
    .unwrap();
    let out = run(&["policy", "check", dir.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr.contains("broken.cedar"), "{stderr}");
    assert!(stderr.contains("invalid"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn policy_check_refuses_a_policy_the_schema_rejects() {
    let dir = tempfile::tempdir().unwrap();
    copy_policies(dir.path());
    fs::write(
        dir.path().join("typo.cedar"),
        "permit (principal, action, resource)\nwhen { principal.nosuch == \"x\" };\n",
    )
    .unwrap();
    let out = run(&["policy", "check", dir.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr.contains("schema"), "{stderr}");
    assert!(stderr.contains("nosuch"), "{stderr}");
}

#[test]
fn policy_check_refuses_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let out = run(&["policy", "check", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("not a directory"), "{out:?}");
    // `policy test` too: with no policies, a suite of cases that must be
    // denied would pass.
    let cases = dir.path().join("deny.toml");
    fs::write(
        &cases,
        "[[case]]\nname = \"no delete in prod\"\nagent = { issuer = \"https://k8s.example\", subject = \"system:serviceaccount:agents:a\" }\ntool = \"github\"\naction = \"delete\"\nenvironment = \"prod\"\nexpect = \"deny\"\n",
    )
    .unwrap();
    let out = run(&[
        "policy",
        "test",
        cases.to_str().unwrap(),
        "--policies",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("not a directory"), "{out:?}");
}

// --- policy test -----------------------------------------------------------

fn examples() -> PathBuf {
    repo_policies().join(EXAMPLES)
}

#[test]
fn policy_test_passes_the_shipped_examples() {
    let file = examples();
    let cases = fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter(|l| l.trim() == "[[case]]")
        .count();
    assert!(cases >= 10, "only {cases} cases");
    let out = run(&[
        "policy",
        "test",
        file.to_str().unwrap(),
        "--policies",
        repo_policies().to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), cases + 1, "{stdout}");
    for line in &lines[..cases] {
        assert!(line.starts_with("ok "), "{line}");
    }
    assert_eq!(lines[cases], format!("{cases} passed, 0 failed"));
}

#[test]
fn policy_test_defaults_to_the_policies_of_the_working_directory() {
    let out = scrip()
        .args(["policy", "test", EXAMPLES, "--policies", "."])
        .current_dir(repo_policies())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let dir = tempfile::tempdir().unwrap();
    copy_policies(&dir.path().join("policies"));
    let out = scrip()
        .args(["policy", "test", examples().to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(text(&out.stdout).contains(" passed, 0 failed"), "{out:?}");
}

#[test]
fn policy_test_reports_a_wrong_expectation() {
    const CASE: &str = "write-needs-ticket: a purpose naming JIRA-123 allows a write";
    let original = fs::read_to_string(examples()).unwrap();
    let at = original
        .find(&format!("name = \"{CASE}\""))
        .expect("the case is in the examples");
    let (head, tail) = original.split_at(at);
    let flipped = format!(
        "{head}{}",
        tail.replacen("expect = \"allow\"", "expect = \"deny\"", 1)
    );
    assert_ne!(flipped, original);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flipped.test.toml");
    fs::write(&file, flipped).unwrap();

    let out = run(&[
        "policy",
        "test",
        file.to_str().unwrap(),
        "--policies",
        repo_policies().to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let failures: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(failures.len(), 1, "{stdout}");
    assert!(
        failures[0].starts_with(&format!("FAIL {CASE} -> allow")),
        "{}",
        failures[0]
    );
    assert!(stdout.trim_end().ends_with(" passed, 1 failed"), "{stdout}");
}

#[test]
fn policy_test_refuses_an_invalid_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.test.toml");
    fs::write(
        &file,
        "[[case]]\nname = \"typo\"\nagent = { issuer = \"i\", subject = \"s\" }\ntool = \"t\"\n\
         action = \"read\"\nenvironment = \"dev\"\nexpekt = \"deny\"\n",
    )
    .unwrap();
    let out = run(&[
        "policy",
        "test",
        file.to_str().unwrap(),
        "--policies",
        repo_policies().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("expekt"), "{out:?}");
}

/// With `--config`, `policy test` refuses what `scrip serve` would refuse
/// with it: here a `forbid` at a tool the configuration does not have
/// (a misspelt name, which would never apply), before any case runs.
#[test]
fn policy_test_with_a_config_refuses_a_forbid_at_an_unconfigured_tool() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    copy_policies(&policies);
    fs::write(
        policies.join("typo.cedar"),
        "@id(\"no-delete\")\nforbid (principal, action == Action::\"delete\", resource == Tool::\"githib\");\n",
    )
    .unwrap();
    let config = dir.path().join("scrip.toml");
    fs::write(
        &config,
        "[[tools]]\nname = \"github\"\nresource = \"https://api.github.com\"\nactions = [\"read\", \"delete\"]\n",
    )
    .unwrap();
    let file = dir.path().join("t.test.toml");
    fs::write(
        &file,
        "[[case]]\nname = \"read\"\nagent = { issuer = \"i\", subject = \"s\" }\ntool = \"github\"\n\
         action = \"read\"\nenvironment = \"dev\"\nexpect = \"deny\"\n",
    )
    .unwrap();
    let args = |with_config: bool| {
        let mut a = vec![
            "policy".to_owned(),
            "test".to_owned(),
            file.display().to_string(),
            "--policies".to_owned(),
            policies.display().to_string(),
        ];
        if with_config {
            a.extend(["--config".to_owned(), config.display().to_string()]);
        }
        a
    };
    fn refs(a: &[String]) -> Vec<&str> {
        a.iter().map(String::as_str).collect()
    }
    let with = args(true);
    let out = run(&refs(&with));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("`no-delete` forbids only at tool `githib`"),
        "{out:?}"
    );
    // Without a configuration there are no tools to check against.
    let without = args(false);
    let out = run(&refs(&without));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// A GitHub Actions OIDC token always carries `ref` (and many more claims):
/// such an identity must reach Cedar, and acme/web may read in dev.
#[test]
fn policy_test_accepts_a_full_github_actions_identity() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gha.test.toml");
    fs::write(
        &file,
        r#"
[[case]]
name = "acme/web read dev, with the claims GitHub sends"
tool = "github"
action = "read"
environment = "dev"
expect = "allow"
[case.agent]
issuer = "https://token.actions.githubusercontent.com"
subject = "repo:acme/web:ref:refs/heads/main"
[case.agent.claims]
aud = "scrip"
repository = "acme/web"
repository_owner = "acme"
repository_id = "74"
workflow = "ci"
ref = "refs/heads/main"
ref_type = "branch"
sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4"
actor = "octocat"
event_name = "push"
run_id = "5"
job_workflow_ref = "acme/web/.github/workflows/ci.yml@refs/heads/main"
"#,
    )
    .unwrap();
    let out = run(&[
        "policy",
        "test",
        file.to_str().unwrap(),
        "--policies",
        repo_policies().to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

// --- serve -----------------------------------------------------------------

#[test]
fn serve_creates_a_private_key_keeps_it_and_refuses_an_exposed_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_policies(&root.join("policies"));

    // First start: the config only sets the address; everything else is a
    // default, relative to the working directory.
    let addr = write_config(root, "");
    let mut server = Server::start(root, "scrip.toml", addr, "serve1.log");
    let metadata = server.wait_ready();
    assert_eq!(metadata["issuer"], format!("http://{addr}"), "{metadata}");
    let kid = server.jwks_kid();

    let data = root.join(".scrip");
    let key = data.join("keys").join("signing-es256.json");
    assert_eq!(mode(&data), 0o700, "{}", data.display());
    assert_eq!(mode(&data.join("keys")), 0o700);
    assert_eq!(mode(&key), 0o600, "{}", key.display());
    assert!(data.join("scrip.db").exists());

    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "{}", server.log());
    drop(server);

    // Restarted, it signs with the same key.
    let addr = write_config(root, "");
    let mut server = Server::start(root, "scrip.toml", addr, "serve2.log");
    server.wait_ready();
    assert_eq!(server.jwks_kid(), kid);
    assert_eq!(server.terminate().code(), Some(0), "{}", server.log());
    drop(server);

    // A key file others can read is refused, naming the file and the fix.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let addr = write_config(root, "");
    let mut server = Server::start(root, "scrip.toml", addr, "serve3.log");
    let status = wait_exit(&mut server.child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("scrip serve started with an exposed key:\n{}", server.log()));
    let log = server.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("signing-es256.json"), "{log}");
    assert!(log.contains("chmod 600"), "{log}");
    assert!(http_get(addr, "/jwks").is_none(), "it must not serve");
}

#[test]
fn sighup_reloads_valid_policies_and_rejects_invalid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let policies = root.join("policies");
    copy_policies(&policies);
    let addr = write_config(root, "policy_poll_interval = 0\n");
    let mut server = Server::start(root, "scrip.toml", addr, "serve.log");
    server.wait_ready();
    server.wait_log("scrip ready");

    // An invalid file: the reload is refused and the server keeps serving.
    fs::write(policies.join("broken.cedar"), "permit (principal,\n").unwrap();
    signal(server.pid(), "HUP");
    server.wait_log("policy reload rejected");
    assert!(server.log().contains("broken.cedar"), "{}", server.log());
    assert!(
        !server.log().contains("policies reloaded"),
        "{}",
        server.log()
    );
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "{}",
        server.log()
    );
    let (status, _) = http_get(addr, "/.well-known/oauth-authorization-server")
        .expect("the server still answers");
    assert_eq!(status, 200);

    // A valid change: accepted.
    fs::remove_file(policies.join("broken.cedar")).unwrap();
    fs::write(
        policies.join("no-execute.cedar"),
        "@id(\"no-execute\")\nforbid (principal, action == Action::\"execute\", resource);\n",
    )
    .unwrap();
    signal(server.pid(), "HUP");
    server.wait_log("policies reloaded");
    let (status, _) = http_get(addr, "/.well-known/oauth-authorization-server")
        .expect("the server still answers");
    assert_eq!(status, 200);
    assert_eq!(server.terminate().code(), Some(0), "{}", server.log());
}

#[test]
fn serve_refuses_an_unknown_config_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scrip.toml");
    fs::write(&config, "lisen = \"127.0.0.1:0\"\n").unwrap();
    let log = dir.path().join("serve.log");
    let mut child = scrip()
        .args(["serve", "--config", config.to_str().unwrap()])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::from(fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stderr = fs::read_to_string(&log).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    assert!(stderr.contains("lisen"), "{stderr}");
    assert!(stderr.contains("scrip.toml"), "{stderr}");
    assert!(
        !dir.path().join(".scrip").exists(),
        "nothing is created for a refused configuration"
    );
}

// --- a secret typed on a terminal ------------------------------------------

/// A command that reads a token from standard input does not wait in
/// silence at a terminal, where nobody was told to type one: it says to
/// pipe one in.
#[test]
fn a_token_is_not_waited_for_at_a_terminal() {
    for (args, says) in [
        (
            &["task", "end"][..],
            "standard input is a terminal; pipe the token in",
        ),
        (
            &["introspect"][..],
            "standard input is a terminal; pipe one in",
        ),
    ] {
        let pty = Pty::open();
        let mut child = pty.spawn(args);
        let status = wait_exit(&mut child.0, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{args:?} waited at the terminal"));
        assert_eq!(status.code(), Some(1), "{}", pty.screen());
        pty.wait_for(says);
    }
}

/// A pseudo-terminal: the master side the test types on and reads from, and
/// the path of the slave side the command gets as its terminal.
struct Pty {
    master: fs::File,
    slave: PathBuf,
    /// Held open, so that reading the master waits for output instead of
    /// failing (EIO) while no process has the terminal open.
    _held: fs::File,
    /// Everything the command wrote to the terminal.
    screen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Pty {
    fn open() -> Self {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let slave = PathBuf::from(ptsname(&master, Vec::new()).unwrap().into_string().unwrap());
        let master = fs::File::from(master);
        let held = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits().cast_signed())
            .open(&slave)
            .unwrap();
        let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = screen.clone();
        // Reads until every slave side is closed (then EIO).
        std::thread::spawn(move || {
            let mut chunk = [0u8; 1024];
            while let Ok(n) = reader.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Self {
            master,
            slave,
            _held: held,
            screen,
        }
    }

    fn slave_file(&self) -> fs::File {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits().cast_signed())
            .open(&self.slave)
            .unwrap()
    }

    /// Runs `scrip args` as the session leader of this terminal (its
    /// controlling terminal, as in a shell), stdin and stderr on it.
    fn spawn(&self, args: &[&str]) -> Killed {
        let tty = self.slave_file();
        let child = Command::new("setsid")
            .args(["--ctty", "--wait"])
            .arg(env!("CARGO_BIN_EXE_scrip"))
            .args(args)
            .env_remove("SCRIP_CONFIG")
            .env_remove("SCRIP_KEY_ENCRYPTION_KEY")
            .stdin(tty.try_clone().unwrap())
            .stdout(Stdio::piped())
            .stderr(tty)
            .spawn()
            .unwrap();
        Killed(child)
    }

    fn screen(&self) -> String {
        text(&self.screen.lock().unwrap())
    }

    fn wait_for(&self, what: &str) {
        let start = Instant::now();
        while !self.screen().contains(what) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "`{what}` never appeared: {:?}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn type_in(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    /// How many typed bytes wait to be read.
    fn unread(&self) -> usize {
        usize::try_from(rustix::io::ioctl_fionread(&self._held).unwrap()).unwrap()
    }

    /// Whether the terminal echoes and turns Ctrl-C into a signal, as a
    /// shell expects it to.
    fn is_restored(&self) -> bool {
        use rustix::termios::{LocalModes, tcgetattr};
        let modes = tcgetattr(self.slave_file()).unwrap().local_modes;
        modes.contains(LocalModes::ECHO | LocalModes::ISIG)
    }
}

/// A child killed when dropped, so a failed test leaves nothing waiting on
/// a terminal.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_secret_typed_on_a_terminal_is_not_echoed_and_ctrl_c_cancels_with_the_terminal_restored() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("policies")).unwrap();
    write_config(
        root,
        &format!(
            r#"data_dir = "{data}"
policy_dir = "{policies}"

[[tools]]
name = "legacy"
resource = "https://legacy.example"
actions = ["read"]

[[upstreams]]
name = "legacy"
url = "http://127.0.0.1:9"

[upstreams.secrets.read]
max_age = 86400
"#,
            data = root.join("data").display(),
            policies = root.join("policies").display(),
        ),
    );
    let config = root.join("scrip.toml");
    let args = [
        "secret",
        "set",
        "legacy",
        "--action",
        "read",
        "--config",
        config.to_str().unwrap(),
    ];

    // Ctrl-C at the prompt: cancelled, nothing stored, the terminal as it was.
    let mut pty = Pty::open();
    assert!(pty.is_restored(), "a new terminal echoes");
    let mut child = pty.spawn(&args);
    pty.wait_for("secret value for `legacy` `read`: ");
    // The rest of the paste after the Ctrl-C is thrown away, not left for
    // the shell to run.
    pty.type_in(b"half-typ\x03rest-of-paste\n");
    let status = wait_exit(&mut child.0, Duration::from_secs(20)).expect("scrip did not exit");
    assert!(
        pty.is_restored(),
        "echo or signals left off: {}",
        pty.screen()
    );
    assert_eq!(status.code(), Some(1), "{}", pty.screen());
    pty.wait_for("cancelled");
    assert!(!pty.screen().contains("half-typ"), "{}", pty.screen());
    assert_eq!(pty.unread(), 0, "typed input left for the next reader");

    // A paste longer than a terminal line is cut by the terminal: refused,
    // not stored cut short.
    let mut pty = Pty::open();
    let mut child = pty.spawn(&args);
    pty.wait_for("secret value for `legacy` `read`: ");
    let mut long = vec![b'k'; 5000];
    long.push(b'\n');
    pty.type_in(&long);
    let status = wait_exit(&mut child.0, Duration::from_secs(20)).expect("scrip did not exit");
    assert_eq!(status.code(), Some(1), "{}", pty.screen());
    pty.wait_for("pipe it on standard input");
    assert!(pty.is_restored(), "{}", pty.screen());

    // Typed and Enter: stored, never echoed.
    let mut pty = Pty::open();
    let mut child = pty.spawn(&args);
    pty.wait_for("secret value for `legacy` `read`: ");
    pty.type_in(b"typed-Zx81Kq\n");
    let status = wait_exit(&mut child.0, Duration::from_secs(20)).expect("scrip did not exit");
    assert_eq!(status.code(), Some(0), "{}", pty.screen());
    let mut stdout = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert_eq!(stdout, "set `legacy` `read` version 1\n");
    assert!(pty.is_restored(), "{}", pty.screen());
    assert!(!pty.screen().contains("typed-Zx81Kq"), "{}", pty.screen());
    let out = run(&["secret", "list", "--config", config.to_str().unwrap()]);
    assert!(
        text(&out.stdout).contains("legacy"),
        "{}",
        text(&out.stdout)
    );

    // Without a usable checkpoint key on the embedded store, nothing is
    // changed: its audit record could not be signed.
    let checkpoint_key = root.join("data/keys/audit-checkpoint.json");
    let good_key = fs::read(&checkpoint_key).unwrap();
    fs::write(&checkpoint_key, "{}").unwrap();
    let set_piped_at = |config: &Path| {
        let mut child = scrip()
            .args(&args[..args.len() - 1])
            .arg(config)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"piped-Qw93Lm")
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let set_piped = || set_piped_at(&config);
    let versions = || {
        let out = run(&[
            "secret",
            "list",
            "--json",
            "--config",
            config.to_str().unwrap(),
        ]);
        text(&out.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["version"]
                    .as_u64()
                    .unwrap()
            })
            .collect::<Vec<u64>>()
    };
    let out = set_piped();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot sign the audit record of this change")
            && text(&out.stderr).contains("nothing was changed"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(versions(), [1]);

    // The key gone from beside a store that holds records (a store put
    // back without its `keys/`): refused, and no key made in its place,
    // under which every earlier chain would read as tampered with.
    fs::remove_file(&checkpoint_key).unwrap();
    let out = set_piped();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("put back `keys/audit-checkpoint.json`"),
        "{}",
        text(&out.stderr)
    );
    assert!(!checkpoint_key.exists(), "a checkpoint key was made");
    assert_eq!(versions(), [1]);

    // A checkpoint key made by the command whose record cannot be committed
    // (a new store, held by another writer past the 5 s a commit waits)
    // stays, saying it is not on the record (the next command or start
    // records it), and nothing more is written: the command stops.
    let fresh = root.join("fresh");
    fs::create_dir(&fresh).unwrap();
    let fresh_config = fresh.join("scrip.toml");
    fs::write(
        &fresh_config,
        fs::read_to_string(&config).unwrap().replace(
            &root.join("data").display().to_string(),
            &fresh.join("data").display().to_string(),
        ),
    )
    .unwrap();
    let out = run(&["migrate", "--config", fresh_config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let fresh_key = fresh.join("data/keys/audit-checkpoint.json");
    assert!(!fresh_key.exists());
    let db = fresh.join("data/scrip.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut holder = rt.block_on(async {
        use sqlx::Connection as _;
        let mut holder = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .unwrap();
        holder
    });
    let out = set_piped_at(&fresh_config);
    rt.block_on(sqlx::query("ROLLBACK").execute(&mut holder))
        .unwrap();
    drop(holder);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot sign the audit record of this change"),
        "{}",
        text(&out.stderr)
    );
    let made = fs::read_to_string(&fresh_key).unwrap();
    assert!(made.contains("\"recorded\": false"), "{made}");
    // The next command records it, and its own change, both signed: the
    // first version, since the blocked one stored nothing.
    let out = set_piped_at(&fresh_config);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "set `legacy` `read` version 1\n");
    let made = fs::read_to_string(&fresh_key).unwrap();
    assert!(!made.contains("\"recorded\": false"), "{made}");
    assert_verifies_strictly(&fresh_config);

    // With the key back, the change is made and its record signed.
    fs::write(&checkpoint_key, good_key).unwrap();
    fs::set_permissions(&checkpoint_key, fs::Permissions::from_mode(0o600)).unwrap();
    let out = set_piped();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    assert_eq!(versions(), [2, 1]);
    assert_verifies_strictly(&config);
}

/// `scrip audit verify --strict` passes on the store `config` names.
fn assert_verifies_strictly(config: &Path) {
    let out = run(&[
        "audit",
        "verify",
        "--strict",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `PGHOSTADDR` in scrip's environment would take the store's link to
/// another address than the URL's host, by which scrip judges the link (a
/// database on this host may go without TLS), and a URL without a user a
/// login as the operating-system user: refused, by the server and the
/// commands that open the store, before anything connects.
#[test]
fn a_store_address_or_user_nobody_named_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let db = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    db.set_nonblocking(true).unwrap();
    write_config(
        root,
        &format!(
            "database_url = \"postgres://scrip@{}/scrip\"\n",
            db.local_addr().unwrap()
        ),
    );
    for command in [&["serve"][..], &["audit", "verify"], &["task", "list"]] {
        let out = scrip()
            .args(command)
            .arg("--config")
            .arg(root.join("scrip.toml"))
            .env("PGHOSTADDR", "203.0.113.5")
            .current_dir(root)
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command:?}: {err}");
        assert!(
            err.contains("PGHOSTADDR is set in scrip's environment"),
            "{command:?}: {err}"
        );
    }
    // A URL that names no user, nor PGUSER: the driver would log in as the
    // operating-system user.
    write_config(
        root,
        &format!(
            "database_url = \"postgres://{}/scrip\"\n",
            db.local_addr().unwrap()
        ),
    );
    let out = scrip()
        .args(["audit", "verify", "--config"])
        .arg(root.join("scrip.toml"))
        .env_remove("PGUSER")
        .current_dir(root)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("names no database user"), "{err}");
    assert!(db.accept().is_err(), "something connected");
}

/// `scrip serve` started on a database that accepts the connection and
/// never answers, once it has connected: it waits there, in start-up. The
/// connection, to keep open.
fn waiting_on_a_silent_database(root: &Path) -> (Server, TcpStream) {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let db = silent.local_addr().unwrap();
    let addr = write_config(
        root,
        &format!("database_url = \"postgres://scrip@{db}/scrip\"\n"),
    );
    let server = Server::start(root, "scrip.toml", addr, "serve.log");
    let (held, _) = silent.accept().unwrap();
    (server, held)
}

/// Whoever can change the configuration file decides whom scrip trusts:
/// `scrip serve` and `scrip proxy` refuse one others could write, or that
/// sits in a directory others could write, before they write anything; so
/// does `scrip secret rotate`, which runs the programs it names.
#[test]
fn a_configuration_others_can_change_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_config(root, "");
    let config = root.join("scrip.toml");
    let refused = |why: &str| {
        for command in [&["serve"][..], &["proxy"], &["secret", "rotate", "legacy"]] {
            let out = scrip()
                .args(command)
                .arg("--config")
                .arg(&config)
                .current_dir(root)
                .output()
                .unwrap();
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{command:?}: {err}");
            assert!(err.contains(why), "{command:?}: {err}");
            assert!(
                err.contains("could change whom scrip trusts"),
                "{command:?}: {err}"
            );
            assert!(
                !root.join(".scrip").exists(),
                "{command:?} wrote before refusing"
            );
        }
    };
    fs::set_permissions(&config, fs::Permissions::from_mode(0o666)).unwrap();
    refused(&format!("`{}` has mode 666", config.display()));
    // The group's write too, as for a key or a `jwks_file`.
    fs::set_permissions(&config, fs::Permissions::from_mode(0o664)).unwrap();
    refused("members of its group could");
    // A configuration that is no file on disk (`--config <(...)`, a pipe
    // the invoking shell fills) has nothing to check.
    let mut piped = scrip()
        .args(["secret", "rotate", "legacy", "--config", "/dev/stdin"])
        .current_dir(root)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = piped.stdin.take().unwrap();
        stdin.write_all(b"listen = \"127.0.0.1:1\"\n").unwrap();
    }
    let out = piped.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(err.contains("no upstream `legacy`"), "{err}");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(root, fs::Permissions::from_mode(0o777)).unwrap();
    refused(&format!("`{}` has mode 777", root.display()));
    // In a JSON log, the reason is a JSON line too (a log pipeline reading
    // a pod that will not start finds it).
    let out = scrip()
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .current_dir(root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let last: serde_json::Value = err
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("not a JSON line: {err}"));
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("has mode 777")),
        "{last}"
    );
    fs::set_permissions(root, fs::Permissions::from_mode(0o700)).unwrap();
}

/// A stop signal during start-up waits for start-up to end (the stop is
/// then graceful); a second one abandons a start-up that hangs, here on a
/// database that accepts the connection and never answers.
#[test]
fn a_second_signal_abandons_a_start_up_that_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, _held) = waiting_on_a_silent_database(dir.path());
    signal(server.pid(), "TERM");
    server.wait_log("stopping once start-up is done");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "{}",
        server.log()
    );
    signal(server.pid(), "INT");
    // Well before the store's own 5 s connection timeout.
    let status = wait_exit(&mut server.child, Duration::from_secs(3))
        .unwrap_or_else(|| panic!("scrip serve ignored the second signal:\n{}", server.log()));
    assert_eq!(status.code(), Some(1), "{}", server.log());
    assert!(
        server.log().contains("stopped during start-up"),
        "{}",
        server.log()
    );
}

/// A SIGHUP during start-up (a `systemctl reload` while scrip waits on its
/// store) does not end the process: SIGHUP's default action would.
#[test]
fn a_sighup_during_start_up_does_not_end_scrip() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, _held) = waiting_on_a_silent_database(dir.path());
    signal(server.pid(), "HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "a SIGHUP during start-up ended scrip:\n{}",
        server.log()
    );
    signal(server.pid(), "TERM");
    server.wait_log("stopping once start-up is done");
    signal(server.pid(), "INT");
    let status = wait_exit(&mut server.child, Duration::from_secs(3))
        .unwrap_or_else(|| panic!("scrip serve ignored the second signal:\n{}", server.log()));
    assert_eq!(status.code(), Some(1), "{}", server.log());
}

/// SIGTERM waits for requests at work (up to the drain's 35 s); a second
/// one stops waiting, and the server still shuts down cleanly (exit 0, its
/// audit trail whole).
#[test]
fn a_second_sigterm_stops_waiting_for_requests_at_work() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_policies(&root.join("policies"));
    let addr = write_config(root, "");
    let mut server = Server::start(root, "scrip.toml", addr, "serve.log");
    server.wait_ready();
    // A request at work: a form body that is slow to come (the server
    // waits 10 s for it).
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    write!(
        slow,
        "POST /token HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ngrant_type="
    )
    .unwrap();
    // Connections are accepted in order: once a later one is answered, the
    // slow one is in.
    assert!(http_get(addr, "/readyz").is_some(), "{}", server.log());
    signal(server.pid(), "TERM");
    server.wait_log("signal again");
    // Still waiting for the slow request.
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "{}",
        server.log()
    );
    let hurried = Instant::now();
    signal(server.pid(), "TERM");
    // Well before the 10 s the request would take (its answer cannot be
    // sooner): only the second signal explains it.
    let status = wait_exit(&mut server.child, Duration::from_secs(8))
        .unwrap_or_else(|| panic!("a second SIGTERM did not stop the wait:\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(hurried.elapsed() < Duration::from_secs(8));
    assert!(
        server.log().contains("stopping at once"),
        "{}",
        server.log()
    );
    drop(slow);
    let out = scrip()
        .args(["audit", "verify", "--strict", "--config", "scrip.toml"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// A log line that cannot be written (standard error on a full disk) is
/// dropped, and the thread that logged goes on: the subscriber's own report
/// of the failure would panic it (the listener at start, a handler, the
/// store's writer on its first failed commit).
/// Sends a request scrip refuses, and logs; panics unless it is answered
/// within 5 s.
fn refuse_one(addr: SocketAddr) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let body = "grant_type=nonsense";
    write!(
        stream,
        "POST /token HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(
        response.starts_with("HTTP/1.1 400"),
        "a refused request went unanswered: {response:?}"
    );
}

/// Standard error that is not read (a stalled log collector) holds up no
/// request, nor the stop.
#[test]
fn a_stalled_standard_error_holds_up_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_policies(&root.join("policies"));
    let addr = write_config(root, "");
    let mut child = scrip()
        .args(["serve", "--config", "scrip.toml"])
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start scrip serve");
    let mut unread = child.stderr.take().unwrap();
    // Room for a few lines only (a page), so that it is full at once.
    rustix::pipe::fcntl_setpipe_size(&unread, 4096).unwrap();
    let mut server = Server {
        child,
        addr,
        log: root.join("no.log"),
    };
    server.wait_ready();
    // Each refused request logs a line (up to 100 a second): many pages.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        refuse_one(addr);
    }
    // Read again: the lines queued come out.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut chunk = [0u8; 65536];
        while let Ok(n) = unread.read(&mut chunk) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&chunk[..n]));
            let _ = tx.send(text.clone());
        }
    });
    let mut text = String::new();
    while !text.contains("more lines were not logged one by one") {
        text = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("the queued lines did not come out: {text}"));
    }
    assert!(text.lines().count() > 100, "{text}");
    signal(server.pid(), "TERM");
    let status =
        wait_exit(&mut server.child, Duration::from_secs(20)).expect("scrip serve ignored SIGTERM");
    assert_eq!(status.code(), Some(0));
}

/// `scrip key withdraw` on the embedded store withdraws nothing (its key
/// is a file) and says which file to move away; it needs a reason.
#[test]
fn key_withdraw_on_the_embedded_store_names_the_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_policies(&root.join("policies"));
    write_config(root, "");
    let out = scrip()
        .args([
            "key",
            "withdraw",
            "--config",
            "scrip.toml",
            "--reason",
            "INC-7",
        ])
        .current_dir(root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("move `.scrip/keys/signing-es256.json` away"),
        "{err}"
    );
    let out = scrip()
        .args(["key", "withdraw", "--config", "scrip.toml"])
        .current_dir(root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_full_disk_under_standard_error_stops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy_policies(&root.join("policies"));
    let addr = write_config(root, "");
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let child = scrip()
        .args(["serve", "--config", "scrip.toml"])
        .current_dir(root)
        .stdout(Stdio::null())
        .stderr(Stdio::from(full))
        .spawn()
        .expect("start scrip serve");
    let mut server = Server {
        child,
        addr,
        log: root.join("no.log"),
    };
    server.wait_ready();
    // Each refused request logs a line; each is still answered.
    for _ in 0..5 {
        refuse_one(addr);
    }
    assert_eq!(
        http_get(addr, "/readyz").map(|(status, _)| status),
        Some(200)
    );
    signal(server.pid(), "TERM");
    let status =
        wait_exit(&mut server.child, Duration::from_secs(20)).expect("scrip serve ignored SIGTERM");
    assert_eq!(status.code(), Some(0));
}

/// `scrip serve` keeps its memory (keys, sealed secrets once opened) out of
/// core dumps and away from other processes of its uid: it is not
/// dumpable, so its `/proc/<pid>/environ` and `mem` belong to root, not to
/// the user it runs as.
#[test]
fn the_server_is_kept_out_of_core_dumps() {
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::process::CommandExt as _;
    // Root's processes' entries are root's whatever they do: as root (CI),
    // scrip runs as another user; as anyone else, as that user.
    let user = (rustix::process::geteuid().is_root()).then_some(65534);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A copy of the binary that user may run wherever the checkout is (a
    // home directory others may not enter).
    let bin = root.join("scrip");
    fs::copy(env!("CARGO_BIN_EXE_scrip"), &bin).unwrap();
    let mut serve = Command::new(&bin);
    fs::create_dir(root.join("policies")).unwrap();
    let addr = write_config(
        root,
        &format!(
            "data_dir = \"{}\"\npolicy_dir = \"{}\"\n",
            root.join("data").display(),
            root.join("policies").display()
        ),
    );
    if let Some(user) = user {
        for path in [root, &root.join("policies"), &root.join("scrip.toml")] {
            std::os::unix::fs::chown(path, Some(user), Some(user)).unwrap();
        }
        serve.uid(user).gid(user);
    }
    let log = root.join("serve.log");
    serve
        .env_remove("SCRIP_CONFIG")
        .env_remove("SCRIP_LOG_FORMAT")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    let child = serve
        .args([
            "serve",
            "--config",
            root.join("scrip.toml").to_str().unwrap(),
        ])
        .current_dir(root)
        .env("HOME", root)
        .stdout(Stdio::null())
        .stderr(Stdio::from(fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let mut server = Server { child, addr, log };
    server.wait_ready();
    for entry in ["environ", "mem"] {
        let owner = fs::metadata(format!("/proc/{}/{entry}", server.pid()))
            .unwrap()
            .uid();
        assert_eq!(owner, 0, "scrip serve (as {user:?}) is dumpable: {entry}");
    }
    assert_eq!(server.terminate().code(), Some(0), "{}", server.log());
}
